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

# short customer questions for the multi-tenant (shared system prompt) benchmarks
QUESTIONS = [
    "When are you open?",
    "Can I book for tomorrow?",
    "Do you take cards?",
    "Where are you?",
    "Is there parking?",
    "Can I bring a dog?",
    "Who do I call?",
    "Do you have a website?",
    "Is it busy on Sundays?",
    "Can I get a refund?",
    "Do you speak English?",
    "Is there a student discount?",
]
