"""Tables, figures, Markdown and HTML reports read from a cube; never runs a scoring pass."""
