// A CPU-bound Go program built with Go's defaults: main.main -> work -> fib.
package main

import (
	"os"
	"strconv"
	"time"
)

//go:noinline
func fib(n int) int {
	if n < 2 {
		return n
	}
	return fib(n-1) + fib(n-2)
}

//go:noinline
func work(until time.Time) int {
	total := 0
	for time.Now().Before(until) {
		total += fib(22)
	}
	return total
}

func main() {
	seconds, _ := strconv.Atoi(os.Args[1])
	os.Exit(work(time.Now().Add(time.Duration(seconds)*time.Second)) & 1)
}
