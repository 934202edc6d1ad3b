"""The stages, one module each: 1 checks, 2 bootstrap (+ traces), 3 datasets (+ adapters, token_plan),
4 finetune, 5 rebind, 6 evaluate. Each is a function over run records; only `bootfinetune.compiler` and
`bootfinetune.pipeline` order them."""
