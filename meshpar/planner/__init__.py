"""The planner: predicts memory and step time of any layout from the model, the cluster
and the job, without starting a process group, and searches for the best one."""
