"""Layer 7, may import: everything below. Experiments across runs.

compare (a group of runs with one data split and seed, side by side), advisor (the data amount x
task similarity matrix turned into a recommended freeze plan, from evidence on the user's data), race
(freeze plans raced under a wall-clock budget by successive halving; the winner is a normal run;
race.py schedules, race_plans, race_estimate, race_lane, race_registry and race_process do the rest).
"""
