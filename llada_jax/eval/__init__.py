"""Evaluation of the student as a drafter: acceptance metrics under the drafting condition."""
