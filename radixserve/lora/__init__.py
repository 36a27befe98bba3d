"""LoRA adapters: PEFT files → validated weights, the engine's adapter registry, batched application.

`refs` is torch-free (the API process and the config use it); the rest runs in the engine process.
"""
