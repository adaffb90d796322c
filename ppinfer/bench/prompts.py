"""The benchmark's fixed inputs: 32 short English prompts and a long prompt of an exact length.

Fixed text (not random tokens) keeps the runs comparable between machines and commits, and
gives the model ordinary English to continue. Every prompt is one line, because the runtime's
`prompts_file` holds one prompt per line.
"""

from __future__ import annotations

from ppinfer.text.tokenizer import Tokenizer

SHORT_PROMPTS: tuple[str, ...] = (
    "The three most important things to know about the ocean are",
    "Write a short poem about a lighthouse keeper who waits for a ship that never arrives.",
    "Explain in simple words why the sky looks blue during the day and red at sunset.",
    "Once upon a time, in a small village at the foot of the mountains, there lived",
    "List five healthy breakfast ideas that take less than ten minutes to prepare.",
    "The history of the printing press began in the fifteenth century when",
    "Describe the smell of fresh bread coming out of the oven on a cold morning.",
    "What are the main differences between a comet and an asteroid?",
    "Give me three tips for learning a new language as an adult.",
    "The old train station had been closed for years, but one night a light appeared in",
    "Summarize the plot of a detective story set in a snowy mountain hotel.",
    "How does a refrigerator keep food cold without any ice inside it?",
    "Write a friendly email inviting your neighbours to a garden party on Saturday.",
    "The best way to care for a houseplant that gets very little sunlight is",
    "Explain what a prime number is and give a few examples.",
    "In the year 2150, the first city on Mars celebrated its hundredth birthday by",
    "Why do cats purr, and what does it usually mean?",
    "Describe a busy market in a coastal town early in the morning.",
    "Write the opening paragraph of a letter from a sailor to his sister back home.",
    "What should a beginner know before running their first marathon?",
    "The recipe for a simple tomato soup starts with",
    "Explain how bees communicate the location of flowers to each other.",
    "A young inventor built a machine that could translate the songs of whales, and",
    "What are some good habits for keeping a tidy and calm workspace?",
    "Tell a short story about a robot who learns to paint.",
    "The main causes of the French Revolution can be summarized as",
    "How do volcanoes form, and why are some of them more dangerous than others?",
    "Write a short speech thanking a teacher who is retiring after forty years.",
    "The library was silent except for the sound of rain against the tall windows, when",
    "Give a step by step explanation of how to change a flat bicycle tyre.",
    "What makes a good friend, according to philosophers and ordinary people alike?",
    "Describe the view from the top of a high mountain just after sunrise.",
)
"""32 varied prompts of roughly 10 to 25 tokens each (two lanes of 16 by default)."""

LONG_PROMPT_PARAGRAPH = (
    "The river runs slowly through the valley, past old stone bridges, quiet farms and the "
    "small town where the market opens every Thursday. In spring the water rises with melted "
    "snow from the hills, and the fishermen wait on the banks for the trout to return. In "
    "autumn the leaves of the chestnut trees turn gold and drift down to the water, where the "
    "current carries them towards the sea. The people of the valley tell stories about the "
    "river: how it once flooded the mill, how a child crossed it on the ice, how a boat "
    "full of apples sank near the church and fed the ducks for a week. "
)
"""A plain English paragraph (no newline) repeated to build the long prefill prompt."""


def short_prompts(count: int) -> list[str]:
    """The first `count` built-in prompts, cycling through the list when more are asked for."""
    if count < 1:
        raise ValueError(f"prompt count must be at least 1, got {count}")
    return [SHORT_PROMPTS[i % len(SHORT_PROMPTS)] for i in range(count)]


def long_prompt(tokenizer: Tokenizer, n_tokens: int) -> str:
    """A prompt that `tokenizer.encode` (the runtime's own call) turns into exactly `n_tokens`.

    The repeated paragraph is encoded, cut to length and decoded; BPE can merge differently
    across the cut when the text is encoded again, so a few neighbouring cuts are tried until
    one round-trips to the exact count.
    """
    bos = 1 if tokenizer.add_bos else 0
    if n_tokens <= bos:
        raise ValueError(f"long prompt length must exceed {bos} token(s), got {n_tokens}")
    per_paragraph = len(tokenizer.encode(LONG_PROMPT_PARAGRAPH, add_bos=False))
    repeats = n_tokens // max(per_paragraph, 1) + 2
    ids = tokenizer.encode(LONG_PROMPT_PARAGRAPH * repeats, add_bos=False)
    target = n_tokens - bos
    for cut in (target, target - 1, target + 1, target - 2, target + 2, target - 3, target + 3):
        text = tokenizer.decode(ids[:cut])
        if len(tokenizer.encode(text)) == n_tokens:
            return text
    raise ValueError(f"could not build a prompt of exactly {n_tokens} tokens with this tokenizer")
