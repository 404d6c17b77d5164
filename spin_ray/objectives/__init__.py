"""The objectives: one record per algorithm, their losses, and the log-prob math they read (plain torch, no Ray)."""
