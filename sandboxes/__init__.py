"""Test equipment: real HTTP servers that enforce each vendor's contract, each in its own process.

Never part of the production package or image: ``python -m sandboxes.<name>`` (mailchimp, klaviyo,
sendgrid, shopify) runs one; ``pip install -e '.[dev]'`` makes them importable.
"""
