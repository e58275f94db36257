"""The language stage: prompts, multimodal LLM backends and the records of their answers."""
