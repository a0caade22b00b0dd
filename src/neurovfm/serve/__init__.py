"""``neurovfm serve``: a local web viewer in front of :class:`neurovfm.analyze.pipeline.Analyzer`.

People judge a model by looking at images with its findings on them, on their own machine and
with their own studies, without sending a scan anywhere. So the page is static (no build step,
no CDN), the server binds to loopback unless a token guards it, uploaded originals are deleted
once analysed, and nothing identifying reaches a log or a URL.
"""
