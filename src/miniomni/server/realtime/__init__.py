"""The OpenAI Realtime API, whatever carries it.

:mod:`.protocol` (client events checked, server events built, as pure functions),
:mod:`.session` (one Realtime session: events in, session updates, input audio and turns),
:mod:`.answers` (its responses: engine events into protocol events, transcripts, cancel, truncate),
:mod:`.ephemeral` (short-lived client secrets that carry a session's configuration).
"""
