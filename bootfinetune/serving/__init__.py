"""The finetuned models answering calls: in process (a dspy.LM engine), over HTTP, or on Ray Serve."""
