"""The benchmark workload: built-in prompts and the request body sent to every server.

Every server gets byte-for-byte the same requests in the same order, so a run is only a
function of (seed, number of requests, max_tokens).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

# Short, varied user prompts; each is roughly 30-80 tokens with the SmolLM2 tokenizer.
PROMPTS: tuple[str, ...] = (
    "Explain in simple terms why the sky looks blue during the day but red and orange at "
    "sunset. Mention the role of the atmosphere and the angle of the sunlight. Finish with one "
    "sentence on why the sky on Mars looks different, and keep the whole answer friendly and "
    "free of equations.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle that seems "
    "to have been written by someone who lived on the same island a century ago. The keeper "
    "should slowly realise that the writer describes events that have not happened yet.",
    "List five practical tips for someone who wants to start running regularly but keeps losing"
    " motivation after the first week. Keep each tip to one or two sentences. Add a short note "
    "on how to avoid common injuries such as shin splints.",
    "What is the difference between a list and a tuple in Python? Give a small example of when "
    "you would choose each one and explain why. Also mention what happens if you try to change "
    "an element of a tuple, and whether tuples can be used as dictionary keys.",
    "Describe the water cycle to a ten-year-old, covering evaporation, condensation, "
    "precipitation and collection, and end with a fun fact about clouds.",
    "I have eggs, spinach, a little cheese and some leftover rice. Suggest a simple dinner I "
    "could cook in under twenty minutes and give the steps. I only have one pan and a "
    "microwave, and I would like to avoid wasting anything.",
    "Summarize the main causes of the French Revolution in a few sentences, focusing on the "
    "economic situation, social inequality and new political ideas of the time. Then name two "
    "events from 1789 that are usually seen as turning points, and say briefly why historians "
    "consider them important.",
    "Write a polite email to a colleague asking them to review a document by Friday, and offer "
    "to help with their project in return next week. The tone should be friendly but "
    "professional, and the email should be no longer than a short paragraph.",
    "Why do cats purr? Describe what scientists currently believe about how the sound is "
    "produced and the different situations in which cats do it. Is it always a sign that the "
    "cat is happy, or can it mean something else, such as pain or stress?",
    "Compose a four-line poem about autumn leaves falling in a quiet city park early in the "
    "morning, with a gentle and slightly nostalgic tone.",
    "Explain what a hash table is, how it stores and finds values, and what happens when two "
    "keys end up in the same bucket. Compare chaining with open addressing, and say what a load"
    " factor is and why resizing matters.",
    "Give me a beginner's plan for learning to play the guitar over the next month, with a goal"
    " for each week and how long to practice every day.",
    "What are the benefits and drawbacks of working from home compared with working in an "
    "office? Consider productivity, communication and well-being. Finish with three suggestions"
    " for a team that wants to combine both ways of working without losing its sense of "
    "community.",
    "Describe how a bicycle stays upright while it is moving, and why it is much harder to "
    "balance one when it is standing still.",
    "Translate the idea of compound interest into an everyday example with numbers, so that a "
    "teenager saving pocket money can understand why starting early helps. Use a starting "
    "amount of one hundred dollars and an interest rate of five percent a year, and show the "
    "balance after one, ten and thirty years.",
    "Write a product description for a reusable water bottle that keeps drinks cold for a whole"
    " day, aimed at hikers and people who commute by bike.",
    "How do vaccines train the immune system? Explain antigens, antibodies and memory cells in "
    "plain language without too much jargon. Then explain why some vaccines need booster doses "
    "while others protect for many years after a single shot.",
    "Invent a simple board game for two players that uses only a deck of cards and a few coins,"
    " and explain the rules and how to win.",
    "What should I check before buying a used car? Give a short checklist covering the engine, "
    "the paperwork, the tyres and a test drive. Add a few questions I should ask the seller, "
    "and tell me which warning signs should make me walk away from the deal.",
    "Explain the difference between weather and climate, and why a single cold winter does not "
    "tell us much about long-term global trends.",
    "Write a short dialogue between a robot and a gardener who are arguing politely about the "
    "best time of day to water tomato plants.",
    "Describe three famous bridges in the world, where they are, when they were built and what "
    "makes each of them special from an engineering point of view. Keep each description to "
    "about three sentences and finish by saying which one you would most like to visit.",
    "Give advice to a student who has an important exam in two weeks and feels anxious. Include"
    " study planning, sleep and how to handle stress on the day. The exam covers chemistry and "
    "biology, and the student has about three free hours every evening.",
    "What is photosynthesis? Explain what goes into a leaf, what comes out, and why this "
    "process matters for almost every living thing on Earth. Mention chlorophyll, and explain "
    "why most leaves are green rather than black, even though black would absorb more light.",
)


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    """What every request asks the server to generate."""

    max_tokens: int = 128
    temperature: float = 0.0
    ignore_eos: bool = True
    banned_token_ids: tuple[int, ...] = (0, 2)  # SmolLM2: <|endoftext|>=0, <|im_end|>=2
    include_usage: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)


def select_prompts(num_requests: int, seed: int) -> list[str]:
    """Pick the prompt of each request, deterministically from the seed."""
    rng = random.Random(seed)
    # A unique tag per request keeps any server from serving a prompt out of a cache: this
    # workload measures batching and decode, not prompt reuse (that is the multi-turn bench).
    return [f"(Request {seed}-{i}.) {rng.choice(PROMPTS)}" for i in range(num_requests)]


def build_chat_body(prompt: str, model: str, sampling: SamplingConfig) -> dict[str, Any]:
    """The JSON body of one streaming chat completion request."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "temperature": sampling.temperature,
        "max_tokens": sampling.max_tokens,
    }
    if sampling.include_usage:
        body["stream_options"] = {"include_usage": True}
    if sampling.ignore_eos:
        body["ignore_eos"] = True
    if sampling.banned_token_ids:
        body["logit_bias"] = {str(t): -100.0 for t in sampling.banned_token_ids}
    body.update(sampling.extra_body)
    return body
