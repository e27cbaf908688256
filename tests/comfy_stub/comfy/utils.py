"""Stand-in for comfy.utils.ProgressBar, recording every update."""

updates: list[tuple[int, int]] = []


class ProgressBar:
    def __init__(self, total: int) -> None:
        self.total = total

    def update_absolute(self, value: int, total: int | None = None, preview=None) -> None:
        updates.append((value, total or self.total))
