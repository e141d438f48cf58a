"""On-policy training of the drafter (issue 25): records from its own drafts, rounds."""
