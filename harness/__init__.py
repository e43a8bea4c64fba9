"""Configuration, the job grid and the command line of the OOD benchmark harness."""
