"""The shared training harness: `config` (config files, variants, sweeps, overrides), `loop`
(sharded, checkpointed, logged training of a method's pure functions), `checkpoint` (orbax,
resume with fallback), `logs` (TensorBoard without TensorFlow, metrics.jsonl, progress), `sweep`
(a config file's variants run one by one and tabulated)."""
