"""Runtime pieces the compiled graphs call: custom ops and input guards."""
