"""On-policy training of the drafter: records from its own drafts, scored by the verifier, in rounds."""
