"""The trio shell, as a package (being split into rooms)."""

from xenemu.server.daemon import Daemon, Limits, Session, error_reply, keep_frame_buffers_warm, run_daemon

__all__ = ["Daemon", "Limits", "Session", "error_reply", "keep_frame_buffers_warm", "run_daemon"]
