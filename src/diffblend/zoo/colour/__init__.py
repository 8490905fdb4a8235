"""The colour default model (issue 12): 32x32 RGB scenes of a shape on a background, prompted in words.

``data`` renders the scenes procedurally (nothing downloaded) and parses their prompts; ``classifier``
is the attribute classifier behind the ``prompt_alignment`` reward; ``model`` and ``train`` build and
train the text-to-image model (a ``DigitsPipeline`` with 3 channels at 32x32: the same pipeline class,
so every code path that loads the digits model loads this one).
"""
