"""What starts, configures and feeds the engine: settings, the embedded broker, supervisors, native builds."""
