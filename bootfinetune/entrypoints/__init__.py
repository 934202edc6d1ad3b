"""The ways in besides `BootstrapFinetune`: the `bootfinetune` command, the Ray jobs, retrain,
and DSPy's provider API (`dspy.LM(...).finetune(...)`)."""
