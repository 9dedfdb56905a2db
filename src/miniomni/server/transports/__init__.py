"""What carries a Realtime session: :mod:`.websocket` (``/v1/realtime``) and :mod:`.webrtc`
(``POST /v1/realtime/calls``, which needs the optional aiortc package, so nothing here imports it)."""
