"""The training engine inside each Ray Train worker (also under torchrun or in one plain process):
the loop, its DeepSpeed engine, the renderer shared with inference, LoRA, collectives, progress."""
