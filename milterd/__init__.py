"""milterd: a pre-queue content filter for Postfix that replaces amavisd-new."""

__version__ = "0.1.0"
