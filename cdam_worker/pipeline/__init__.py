"""The write side's pipeline: the run's settings and lock, the decode pool, the actor, the sinks and the driver."""
