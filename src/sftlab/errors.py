"""sftlab's own error type: every problem a user can fix is raised as SftlabError with a message that names
the file, line, row or option at fault, so the CLI can print it without a traceback."""


class SftlabError(Exception):
    """A problem with the user's input or configuration, explained in the message."""


class DataError(SftlabError):
    """Bad data: the message names the file and, where known, the line/row and field."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None, field: str | None = None):
        where = []
        if file is not None:
            where.append(str(file))
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.file, self.line, self.field = file, line, field
        self.detail = message

    def __reduce__(self):
        # Raised in a tokenization worker process, it crosses back with its place intact.
        return _data_error, (self.detail, self.file, self.line, self.field)


def _data_error(message: str, file: str | None, line: int | None, field: str | None) -> DataError:
    return DataError(message, file=file, line=line, field=field)


class ConfigError(SftlabError):
    """A bad option or combination of options; the message names the option."""
