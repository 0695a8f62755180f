package main

import (
	"context"
	"flag"
	"log/slog"
	"os"

	"github.com/sidelane/sidelane/agent"
)

func runAgent(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("agent", flag.ContinueOnError)
	socket := fs.String("socket", agent.DefaultSocket, "Unix socket the CNI plugin talks to")
	stateDir := fs.String("state-dir", agent.DefaultStateDir, "directory for the agent's pod state")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return err
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	a, err := agent.New(agent.Config{Socket: *socket, StateDir: *stateDir, Log: log})
	if err != nil {
		return err
	}
	return a.Run(ctx)
}
