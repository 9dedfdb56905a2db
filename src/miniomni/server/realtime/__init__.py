"""The OpenAI Realtime API, whatever carries it.

:mod:`.protocol` (client events checked, server events built, as pure functions),
:mod:`.session` (one Realtime session: events in, dispatched to its parts; session updates),
:mod:`.conversation` (the items), :mod:`.listening` (input audio and turns), :mod:`.transcripts`
(the user's words), :mod:`.context` (what the parts share and what a transport provides),
:mod:`.answers` (its responses: engine events into protocol events, cancel, truncate),
:mod:`.ephemeral` (short-lived client secrets that carry a session's configuration).
"""
