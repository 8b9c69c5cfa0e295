"""The engine room: the engine's math made fast. Imports the engine; the engine never imports it."""
