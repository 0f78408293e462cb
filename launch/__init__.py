"""Running the table: one machine (the launchers) or a cluster (SLURM through submitit)."""
