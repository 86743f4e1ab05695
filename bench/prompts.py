"""Prompts shared by the decode benchmarks, so their numbers compare."""

PROMPTS = [
    "Write a long story about a dragon who learns to cook.",
    "Explain how a steam engine works, step by step.",
    "List the planets of the solar system and describe each one.",
    "Describe a walk through a busy market in the morning.",
    "Write a letter to a friend about your summer holiday.",
    "Explain why the sky is blue to a ten year old.",
    "Tell the history of the bicycle.",
    "Describe how bread is made, from wheat to loaf.",
]
