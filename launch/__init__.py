"""Running the table: its one description (graph), the pool of runs side by side on one machine (pool), and the
launchers' Python side (launchers; `python -m launch run_all.sh GPU ...`, which the run_*.sh files call)."""
