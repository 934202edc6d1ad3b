"""Test, benchmark and demo support: tiny local models, a scripted teacher server, fault injection.
The stages never import it."""
