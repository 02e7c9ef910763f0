// Command goref is the reference the benchmarks compare uploadsvc against: the design of the
// seed article (GoSuda, "reducing endpoint response time in Go with task queues") built with Go's
// standard library only.
//
// A net/http handler io.Copy's the request body to a temporary file, puts a task on a buffered
// channel (size 100) and answers 202; N worker goroutines take tasks from the channel and POST the
// file to the Incus files endpoint over the local unix socket. Unlike the seed, a worker removes
// its temporary file after each push (the seed's `defer` inside an endless loop never ran).
//
// With -push=false the workers take tasks off the channel without pushing and keep the file, the
// counterpart of uploadsvc with its push workers stopped (the seed would block every handler once
// 100 tasks wait). GET /stats reports counters as JSON; POST /discard reads and drops a body and
// answers 202, to measure the load client on its own.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

const (
	maxRetries = 3
	retryDelay = time.Second
	maxWaits   = 100000
)

// uploadTask holds what a worker needs to push one file.
type uploadTask struct {
	HostTempFilePath         string
	ContainerName            string
	ContainerDestinationPath string
	Size                     int64
	Accepted                 time.Time
}

type stats struct {
	accepted   atomic.Int64
	pushed     atomic.Int64
	failed     atomic.Int64
	lastDoneNs atomic.Int64
	mu         sync.Mutex
	waitsMs    []float64 // 202 → push start, per task
}

type server struct {
	spoolDir string
	project  string
	push     bool
	queue    chan uploadTask
	incus    *http.Client
	stats    *stats
}

func (s *server) upload(wr http.ResponseWriter, req *http.Request) {
	if req.Method != http.MethodPost {
		http.Error(wr, "POST method required.", http.StatusMethodNotAllowed)
		return
	}
	originalFilePath := req.Header.Get("X-File-Path")
	containerName := req.Header.Get("X-Container-Name")
	if originalFilePath == "" || containerName == "" {
		http.Error(wr, "Missing X-File-Path or X-Container-Name header.", http.StatusBadRequest)
		return
	}
	cleanDest := filepath.Clean(originalFilePath)
	if !filepath.IsAbs(cleanDest) {
		http.Error(wr, "File path must be absolute.", http.StatusBadRequest)
		return
	}
	// The seed names the file after time.Now().UnixNano(), which collides under concurrency.
	outFile, err := os.CreateTemp(s.spoolDir, "upload-*")
	if err != nil {
		log.Printf("ERROR: create temp file: %v", err)
		http.Error(wr, "Server error.", http.StatusInternalServerError)
		return
	}
	written, err := io.Copy(outFile, req.Body)
	if cerr := outFile.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(outFile.Name())
		log.Printf("ERROR: copy body: %v", err)
		http.Error(wr, "File transfer failed.", http.StatusInternalServerError)
		return
	}
	s.queue <- uploadTask{
		HostTempFilePath:         outFile.Name(),
		ContainerName:            containerName,
		ContainerDestinationPath: cleanDest,
		Size:                     written,
		Accepted:                 time.Now(),
	}
	s.stats.accepted.Add(1)
	wr.WriteHeader(http.StatusAccepted)
	fmt.Fprintf(wr, "File '%s' queued for processing on container '%s'.\n", cleanDest, containerName)
}

func (s *server) worker() {
	for task := range s.queue {
		if !s.push {
			continue
		}
		s.recordWait(time.Since(task.Accepted))
		var err error
		for i := 0; i <= maxRetries; i++ {
			if err = s.pushFile(task); err == nil {
				break
			}
			var perm permanentError
			if errors.As(err, &perm) || i == maxRetries {
				break
			}
			log.Printf("WARNING: push %s attempt %d: %v; retrying", task.ContainerDestinationPath, i+1, err)
			time.Sleep(retryDelay)
		}
		if err != nil {
			log.Printf("ERROR: push %s failed: %v", task.ContainerDestinationPath, err)
			s.stats.failed.Add(1)
		} else {
			s.stats.pushed.Add(1)
		}
		s.stats.lastDoneNs.Store(time.Now().UnixNano())
		if rerr := os.Remove(task.HostTempFilePath); rerr != nil {
			log.Printf("ERROR: remove %s: %v", task.HostTempFilePath, rerr)
		}
	}
}

func (s *server) recordWait(d time.Duration) {
	s.stats.mu.Lock()
	defer s.stats.mu.Unlock()
	if len(s.stats.waitsMs) < maxWaits {
		s.stats.waitsMs = append(s.stats.waitsMs, float64(d.Microseconds())/1000)
	}
}

type permanentError struct{ msg string }

func (e permanentError) Error() string { return e.msg }

func (s *server) pushFile(task uploadTask) error {
	file, err := os.Open(task.HostTempFilePath)
	if err != nil {
		return permanentError{err.Error()}
	}
	defer file.Close()
	target := fmt.Sprintf(
		"http://incus/1.0/instances/%s/files?path=%s&project=%s",
		url.PathEscape(task.ContainerName),
		url.QueryEscape(task.ContainerDestinationPath),
		url.QueryEscape(s.project),
	)
	req, err := http.NewRequest(http.MethodPost, target, file)
	if err != nil {
		return permanentError{err.Error()}
	}
	req.ContentLength = task.Size
	req.Header.Set("Content-Type", "application/octet-stream")
	req.Header.Set("X-Incus-type", "file")
	req.Header.Set("X-Incus-write", "overwrite")
	resp, err := s.incus.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64*1024))
	switch {
	case resp.StatusCode == http.StatusOK:
		return nil
	case resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusForbidden ||
		resp.StatusCode == http.StatusBadRequest:
		return permanentError{fmt.Sprintf("incus %d: %s", resp.StatusCode, body)}
	default:
		return fmt.Errorf("incus %d: %s", resp.StatusCode, body)
	}
}

func percentile(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(q * float64(len(sorted)-1))
	return sorted[i]
}

func (s *server) statsHandler(wr http.ResponseWriter, _ *http.Request) {
	s.stats.mu.Lock()
	waits := append([]float64(nil), s.stats.waitsMs...)
	s.stats.mu.Unlock()
	sort.Float64s(waits)
	wr.Header().Set("Content-Type", "application/json")
	json.NewEncoder(wr).Encode(map[string]any{
		"accepted":     s.stats.accepted.Load(),
		"pushed":       s.stats.pushed.Load(),
		"failed":       s.stats.failed.Load(),
		"queued":       len(s.queue),
		"last_done_ns": s.stats.lastDoneNs.Load(),
		"waits":        len(waits),
		"wait_p50_ms":  percentile(waits, 0.50),
		"wait_p99_ms":  percentile(waits, 0.99),
	})
}

func discard(wr http.ResponseWriter, req *http.Request) {
	io.Copy(io.Discard, req.Body)
	wr.WriteHeader(http.StatusAccepted)
}

func main() {
	addr := flag.String("addr", "127.0.0.1:8090", "listen address")
	spoolDir := flag.String("spool", "/tmp/incus_uploads", "directory for temporary files")
	socket := flag.String("socket", "/var/lib/incus/unix.socket", "Incus unix socket")
	project := flag.String("project", "default", "Incus project")
	workers := flag.Int("workers", 4, "push goroutines")
	queueSize := flag.Int("queue", 100, "buffered channel size")
	push := flag.Bool("push", true, "push files to Incus (false: dequeue and keep the file)")
	flag.Parse()
	if err := os.MkdirAll(*spoolDir, 0o755); err != nil {
		log.Fatalf("spool dir: %v", err)
	}
	transport := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", *socket)
		},
		MaxIdleConnsPerHost: *workers,
	}
	s := &server{
		spoolDir: *spoolDir,
		project:  *project,
		push:     *push,
		queue:    make(chan uploadTask, *queueSize),
		incus:    &http.Client{Transport: transport, Timeout: 10 * time.Minute},
		stats:    &stats{},
	}
	for i := 0; i < *workers; i++ {
		go s.worker()
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/api/uploads/", s.upload)
	mux.HandleFunc("/upload", s.upload)
	mux.HandleFunc("/stats", s.statsHandler)
	mux.HandleFunc("/discard", discard)
	log.Printf("goref listening on %s (workers=%d queue=%d push=%v)", *addr, *workers, *queueSize, *push)
	log.Fatal(http.ListenAndServe(*addr, mux))
}
