"""``neurovfm analyze``: one study (or a worklist) to findings, triage and maps."""
