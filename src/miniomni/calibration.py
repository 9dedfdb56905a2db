"""Calibration text: what an int8 conversion runs through the float model to find each product's activation ranges.

Plain English of the kinds an assistant hears and says (questions, answers, numbers, names,
instructions), written for this purpose. :func:`calibration_ids` tokenizes it with the
checkpoint's own tokenizer.
"""

from __future__ import annotations

import torch

__all__ = ["CALIBRATION_TEXT", "calibration_ids"]

CALIBRATION_TEXT = """\
What is the capital of France? The capital of France is Paris, a city on the river Seine with about two million \
people. Can you tell me a joke? Why did the scarecrow win an award? Because he was outstanding in his field.
How do I boil an egg? Put the egg in a pot of cold water, bring it to a boil, then let it simmer for nine minutes \
and cool it under running water. Soft eggs need six minutes.
I feel a bit tired today and I have a lot of work to do. That sounds hard. Try to take short breaks, drink some \
water, and start with the task that matters most. A walk outside for ten minutes can help you focus again.
Who wrote Romeo and Juliet? William Shakespeare wrote it around 1595. It tells the story of two young lovers from \
feuding families in Verona.
What's the weather like on Mars? Mars is cold and dry. The average temperature is about minus sixty degrees \
Celsius, and dust storms can cover the whole planet for weeks.
Please set a timer for twenty-five minutes. I can't set timers, but you can say "set a timer" to your phone's \
assistant. Twenty-five minutes is a good length for one focused work session.
How many days are there in a leap year? A leap year has 366 days; February has 29 of them. The next leap years \
are 2028 and 2032.
Explain photosynthesis in simple words. Plants take in sunlight, water and carbon dioxide, and turn them into \
sugar for energy. Oxygen is left over, and they release it into the air we breathe.
Could you recommend a good book? If you like adventure, try Treasure Island by Robert Louis Stevenson. For \
something more recent, many readers enjoy The Martian by Andy Weir.
What's 15 percent of 80? Fifteen percent of eighty is twelve. You can find it by taking ten percent, which is \
eight, and adding half of that, which is four.
Thank you, that was helpful! You're welcome. Is there anything else you would like to know? I'm happy to help \
with questions about science, history, cooking, travel, or just to chat.

How does a computer remember things? It keeps data in memory while it works, as patterns of electric charge, and \
writes what must last to a disk or a flash drive. Memory is fast but forgets everything when the power goes off; \
storage is slower but keeps files for years.
Why do we have seasons? The Earth's axis is tilted by about 23.4 degrees. In June the northern half leans toward \
the Sun, so days are longer and sunlight arrives more directly; six months later it leans away, and winter comes.
What does this code do?

    def average(values):
        if not values:
            raise ValueError("no values given")
        return sum(values) / len(values)

It returns the mean of a list of numbers, and refuses an empty list with a clear error instead of dividing by zero.
Summarize the causes of the First World War. Historians usually name four: alliances that tied the great powers \
together, rivalry between empires, an arms race on land and at sea, and nationalism in the Balkans. The murder of \
Archduke Franz Ferdinand in Sarajevo on 28 June 1914 set them in motion.
How far away is the Moon? On average about 384,400 kilometres, or 238,855 miles. Light covers that distance in \
roughly 1.3 seconds, and the Apollo astronauts took about three days.
Give me three tips for a job interview. First, read about the company and its products. Second, prepare short \
stories that show how you solved real problems. Third, ask your own questions at the end: it shows interest.
Translate "good morning" into Spanish, French and German. Buenos días, bonjour, and guten Morgen.
What is the difference between weather and climate? Weather is what the air does today: rain, wind, a warm \
afternoon. Climate is the pattern of weather over thirty years or more in one place.
"""


def calibration_ids(tokenizer_json: str, max_tokens: int = 1024) -> torch.Tensor:
    """The calibration text as token ids (1, T) of the given tokenizer, at most ``max_tokens``."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_str(tokenizer_json).encode(CALIBRATION_TEXT, add_special_tokens=False).ids
    if not ids:
        raise ValueError("the tokenizer turned the calibration text into no tokens")
    return torch.tensor(ids[:max_tokens]).unsqueeze(0)
