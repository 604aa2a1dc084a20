"""The built-in demo: a demo teacher, built-in data, and the three-student comparison."""
