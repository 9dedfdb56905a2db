"""When the user has finished speaking: :mod:`.vad` (Silero VAD, streamed), :mod:`.endofturn` (semantic
VAD's end-of-turn model) and :mod:`.taking` (the input audio buffer and the turn-taking rules)."""
