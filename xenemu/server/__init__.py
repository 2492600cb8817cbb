"""The trio shell, as a package (being split into rooms)."""

from xenemu.server.admission import Limits
from xenemu.server.daemon import Daemon, keep_frame_buffers_warm, run_daemon
from xenemu.server.session import Session, error_reply

__all__ = ["Daemon", "Limits", "Session", "error_reply", "keep_frame_buffers_warm", "run_daemon"]
