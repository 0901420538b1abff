"""The market simulator and its yardsticks, for bench/ and tests only (nothing in the
runtime path imports this package): a synthetic fleet drawn from the GPU catalog
(`fleet`), request traces (`traces`), a discrete-event market simulation (`simulation`),
and the LP optimum of the routing objective (`optimum`)."""
