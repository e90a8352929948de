"""The progress bar of pimjax's long loops (tqdm), or a silent stand-in."""

from __future__ import annotations


class _Silent:
    """A no-op progress bar."""

    def update(self, n: int = 1) -> None:
        """Do nothing."""

    def set_postfix(self, **kwargs) -> None:
        """Do nothing."""

    def close(self) -> None:
        """Do nothing."""


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "it"):
    """A tqdm bar of ``total`` steps (refreshed at most once a second), or a silent one."""
    if not enabled:
        return _Silent()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                mininterval=1.0)
