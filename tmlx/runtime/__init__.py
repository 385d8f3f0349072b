"""Process start-up, before and while JAX starts: the accelerator and its config row
(`accelerators`), the job's layout from the environment (`cluster`), JAX's distributed runtime
(`distributed`), local multi-process jobs for tests and laptops (`local_cluster`), and the
settings of `config.runtime` (`config`)."""
