// A small HTTP/1.1 server for `pipemoe serve`: one listening socket, a thread that accepts and a
// short-lived thread per connection that reads one request (request line, headers, a body of
// Content-Length bytes) and queues it; the serving loop takes requests from the queue and answers
// each on its connection, whole (JSON) or as server-sent events (a stream of `data:` lines).
// Persistent connections: after a whole answer to a request that keeps its connection alive
// (HTTP/1.1 unless it says `Connection: close`; HTTP/1.0 only with `Connection: keep-alive`) a new
// short-lived thread reads the connection's next request; a stream, an error found while reading,
// and a connection idle for 10 s are closed. Malformed requests, bodies over 1 MiB and slow
// clients (10 s to send a request) are answered here with an error.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

namespace pm::cli {

struct HttpRequest {
  std::string method, path, body;
  std::string authorization;  // the Authorization header's value (empty: none)
  bool keep_alive = false;    // the client keeps the connection for its next request
  int fd = -1;  // the connection: answer with answer(), respond() or a stream
};

class HttpServer {
 public:
  // Listens on host:port (port 0: a free port, port() says which). Throws a usage error naming
  // the address when it cannot.
  HttpServer(const std::string& host, int port);
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;
  int port() const { return port_; }

  // The next request, waiting at most timeout_s; none if none came.
  std::optional<HttpRequest> next(double timeout_s);
  // Requests read and waiting in the queue.
  std::size_t waiting() const;

  // A whole answer; then the connection's next request is read (keep_alive) or it is closed.
  void answer(int fd, bool keep_alive, int status, const std::string& body,
              const std::string& content_type = "application/json");
  // A whole answer, then the connection closed.
  static void respond(int fd, int status, const std::string& body, const std::string& content_type = "application/json");
  // Server-sent events: the headers, then send_event per event; false once the client is gone.
  static bool start_events(int fd);
  static bool send_event(int fd, const std::string& data);
  static void close_connection(int fd);
  // Whether the client closed the connection while its answer was being made (a read would give
  // end of file, or the socket failed): nobody is waiting for the answer. Bytes of a next request
  // (keep-alive) do not count. Never blocks.
  static bool peer_closed(int fd);
  // {"error": {"message": ..., "type": "invalid_request_error"}}, as OpenAI's API answers.
  static std::string error_json(const std::string& message);

 private:
  struct Queue {
    mutable std::mutex mutex;
    std::condition_variable arrived;
    std::deque<HttpRequest> requests;
  };
  void accept_loop();
  // Reads the connection's next request on a thread of its own (a slow client holds up no other)
  // and queues it.
  void read_on(int fd);

  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stopping_{false};
  std::shared_ptr<Queue> queue_ = std::make_shared<Queue>();
  std::thread acceptor_;
};

}  // namespace pm::cli
