"""What training and evaluation read batches with; start-up reads formats/, never runs tools/."""
