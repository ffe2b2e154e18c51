"""Stream processing: the Faust app, its processors, tables and web views."""
