"""The survey application on top of the model layer: survey data to chat examples (`data`, which gathers
`example`, `codes`, `spec`, `spec_values`, `table_checks`, `sources`, `surveys`, `worldvaluesbench`, `splits` and
`prompts`; the spec format's reference is `spec_reference`), profile texts to z (`encoder`), the training script
(`train`, run as `python -m cuma_model.train`) and its checkpoints (`run_checkpoint`), preference training with TRL
(`preference`), and evaluation: metrics, intervals, floors and figures (`metrics`, `intervals`, `evaluate`,
`plots`)."""
