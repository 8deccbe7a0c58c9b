"""What the dense model is given to answer for recovery's `self-chat` data (hywia.recovery_data): instructions.
The prose openings its `self-text` continues live with the calibration's (hywia.calibration.PROSE_OPENINGS).

Varied on purpose (explanations, lists, how-tos, rewriting, short verse, arithmetic, a few facts)
so the pruned model relearns the dense model's chat behaviour in general, not one question type.
They must not overlap the chat check that judges recovery (benchmarks/data/chat_questions.json):
tests/test_recovery.py fails if a prompt here names any of that check's answers.
"""

from __future__ import annotations

TOPICS = (
    "volcanoes", "the printing press", "rainforests", "recycling", "the immune system", "bicycles",
    "electric cars", "the internet", "public libraries", "chess", "gardening", "coffee", "baking bread",
    "earthquakes", "glaciers", "the moon", "ocean tides", "batteries", "vaccines", "democracy",
    "photography", "jazz music", "ancient Greece", "penguins", "octopuses", "dolphins", "mushrooms",
    "rainbows", "clouds", "wind power", "the human brain", "sleep", "regular exercise", "saving money",
    "learning a new language", "public speaking", "time management", "friendship", "cryptography",
    "computer programming", "machine learning", "magnets", "sound waves", "microscopes", "bridges",
    "trains", "origami", "deserts", "coral reefs", "owls", "ants", "the Olympic Games",
)

TEMPLATES = (
    "Explain {topic} in simple terms.",
    "Give me a few interesting facts about {topic}.",
    "Write a short paragraph about {topic}.",
    "Why is {topic} important?",
    "What should a beginner know about {topic}?",
    "Describe {topic} to a child.",
    "Summarize the history of {topic} briefly.",
    "What are common misconceptions about {topic}?",
)

INSTRUCTIONS = (
    "Write a polite email asking a colleague to move our meeting to Friday.",
    "How do I make a good cup of tea?",
    "Give me tips for studying for an exam.",
    "Translate 'good morning' into French and German.",
    "What is 12 times 5?",
    "If I have 15 apples and give away 6, how many are left?",
    "Rewrite this sentence more formally: 'gonna be late, sorry'.",
    "Suggest a name for a pet goldfish.",
    "What is the difference between weather and climate?",
    "How does a refrigerator keep food fresh?",
    "Write a two-line poem about autumn leaves.",
    "What is a noun? Give examples.",
    "Name some healthy breakfast foods.",
    "How can I improve my handwriting?",
    "What is the plural of 'mouse'?",
    "Tell me a short, friendly joke.",
    "How do airplanes stay in the air?",
    "What does a librarian do?",
    "Explain what a verb is.",
    "Who was Marie Curie?",
    "Who was Isaac Newton?",
    "Who was Cleopatra?",
    "What is the difference between a lake and a pond?",
    "How do I change a flat tire on a bicycle?",
    "Write a short thank-you note to a teacher.",
    "What are the primary colors of paint?",
    "Give me a simple recipe for pancakes.",
    "How should I prepare for a job interview?",
    "What is a metaphor? Give an example.",
    "Describe a rainy afternoon in a few sentences.",
    "What is the difference between a virus and a bacterium?",
    "How do I write a good summary of an article?",
    "List some ways to reduce stress.",
    "What does an architect do?",
    "Explain how a rainbow forms.",
    "What is 45 divided by 9?",
    "How many minutes are in two hours?",
    "What is gravity?",
    "Write a limerick about a cat.",
    "What are some good habits for a healthy life?",
    "How do plants drink water through their roots?",
    "Explain what a computer's memory is for.",
    "What is an adjective? Give examples.",
    "Describe the taste of a lemon.",
    "What is the purpose of a museum?",
    "How do I say no politely to an invitation?",
    "Give me a packing list for a weekend camping trip.",
    "Why do leaves change color in autumn?",
)

def recovery_prompts() -> list[str]:
    """Every instruction: the topic questions (topic-major, so a prefix covers many topics) then the rest."""
    by_template = [template.format(topic=topic) for topic in TOPICS for template in TEMPLATES]
    # Interleave: take template i of topic j in an order that varies both, so the first N differ widely.
    ordered = [by_template[(j * len(TEMPLATES)) + (j + i) % len(TEMPLATES)]
               for i in range(len(TEMPLATES)) for j in range(len(TOPICS))]
    return ordered + list(INSTRUCTIONS)
