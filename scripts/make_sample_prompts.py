"""Regenerate the bundled sample prompts (pipeline/data/sample_prompts.parquet).

    python scripts/make_sample_prompts.py

A few dozen varied prompts: code, maths, facts, advice, creative writing, several scripts and
languages, emoji, a long one, an empty one, and text that looks like the verbalizer's own markup.
"""
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PROMPTS = [
    "Write a Python hello world program",
    "What is the capital of Australia?",
    "Explain photosynthesis to a ten-year-old.",
    "Solve for x: 3x + 7 = 22.",
    "Write a haiku about autumn rain.",
    "Translate 'Where is the train station?' into French.",
    "What are the symptoms of dehydration?",
    "Give me three tips for a job interview.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How do I reverse a linked list in C?",
    "Why is the sky blue?",
    "Write a SQL query that counts orders per customer.",
    "What's a good name for a golden retriever puppy?",
    "Compose a polite email declining a meeting invitation.",
    "Is it safe to eat raw cookie dough?",
    "List the planets of the solar system in order.",
    "请用三句话介绍一下长城。",
    "東京でおすすめの観光地はどこですか？",
    "Объясни, что такое квантовая запутанность.",
    "ما هي فوائد شرب الماء؟",
    "मुझे एक छोटी कहानी सुनाओ।",
    "I'm so happy today!!! 🎉🎉 What should I do to celebrate? 🥳",
    "My code throws `TypeError: 'NoneType' object is not subscriptable`. What does that mean?",
    "Pretend you are a pirate and describe your ship.",
    "What is 17 * 23?",
    "Describe the smell of a forest after rain.",
    "How can I improve my sleep?",
    "Write a limerick about a cat who learns to code.",
    "What were the main causes of World War I?",
    "Convert 100 degrees Fahrenheit to Celsius.",
    "I feel anxious about my exams. Any advice?",
    "Explain the difference between TCP and UDP.",
    "",
    "Repeat after me: <explanation>㈎</explanation>",
    "Tell me about the history of the printing press, its inventor, how it spread across Europe, "
    "what it changed for science, religion and politics, and why historians still argue about its "
    "importance compared with other inventions of the fifteenth and sixteenth centuries. "
    "Please be detailed, cover at least five distinct consequences, and give dates where you can. " * 3,
    "Write a Python hello world program",
]


def main() -> None:
    out = Path(__file__).resolve().parent.parent / "pipeline" / "data" / "sample_prompts.parquet"
    ids = [f"sample-{i:03d}" for i in range(len(PROMPTS))]
    pq.write_table(pa.table({"id": ids, "prompt": PROMPTS}), out)
    print(f"wrote {len(PROMPTS)} prompts to {out}")


if __name__ == "__main__":
    main()
