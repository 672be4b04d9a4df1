#include "apps/pipemoe/http_server.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace pm::cli {
namespace {

constexpr std::size_t kMaxBody = 1 << 20;
constexpr std::size_t kMaxHeader = 64 << 10;

const char* reason(int status) {
  switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 413: return "Payload Too Large";
    case 503: return "Service Unavailable";
    default: return "Internal Server Error";
  }
}

bool send_all(int fd, const std::string& data) {
  std::size_t sent = 0;
  while (sent < data.size()) {
    const ssize_t n = ::send(fd, data.data() + sent, data.size() - sent, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    sent += static_cast<std::size_t>(n);
  }
  return true;
}

// A whole answer: the status line, the headers and the body.
std::string whole_answer(int status, const std::string& content_type, const std::string& body, bool keep_alive) {
  return fmt::format("HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n", status,
                     reason(status), content_type, body.size(), keep_alive ? "keep-alive\r\nKeep-Alive: timeout=10" : "close") +
         body;
}

// A header's value as sent, without the spaces around it (empty: no such header); `lower` is the
// head in lower case, where the name is looked for.
std::string header_value(const std::string& head, const std::string& lower, const std::string& name) {
  const std::size_t at = lower.find("\r\n" + name + ":");
  if (at == std::string::npos) return "";
  const std::size_t from = at + 3 + name.size(), to = head.find("\r\n", from);
  std::string value = head.substr(from, (to == std::string::npos ? head.size() : to) - from);
  const auto space = [](unsigned char c) { return c == ' ' || c == '\t'; };
  while (!value.empty() && space(value.front())) value.erase(0, 1);
  while (!value.empty() && space(value.back())) value.pop_back();
  return value;
}

// Reads one request from a connection; answers it here (and returns false) when it is malformed.
bool read_request(int fd, HttpRequest& request) {
  timeval timeout{10, 0};  // a client that sends nothing for 10 s is dropped
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  std::string data;
  char buffer[8192];
  std::size_t header_end = std::string::npos;
  while (header_end == std::string::npos) {
    const ssize_t n = ::recv(fd, buffer, sizeof buffer, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (!data.empty()) HttpServer::respond(fd, 408, HttpServer::error_json("the request did not arrive whole"));
      else HttpServer::close_connection(fd);
      return false;
    }
    data.append(buffer, static_cast<std::size_t>(n));
    header_end = data.find("\r\n\r\n");
    if (header_end == std::string::npos && data.size() > kMaxHeader) {
      HttpServer::respond(fd, 413, HttpServer::error_json("headers over 64 KiB"));
      return false;
    }
  }
  const std::string head = data.substr(0, header_end);
  const std::size_t line_end = head.find("\r\n");
  const std::string line = head.substr(0, line_end);
  const std::size_t sp1 = line.find(' '), sp2 = line.find(' ', sp1 + 1);
  if (sp1 == std::string::npos || sp2 == std::string::npos || line.compare(sp2 + 1, 5, "HTTP/") != 0) {
    HttpServer::respond(fd, 400, HttpServer::error_json("not an HTTP request line: '" + line.substr(0, 80) + "'"));
    return false;
  }
  request.method = line.substr(0, sp1);
  request.path = line.substr(sp1 + 1, sp2 - sp1 - 1);
  std::size_t length = 0;
  std::string lower = head;
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  // HTTP/1.1 keeps the connection unless told to close it; HTTP/1.0 closes it unless told to keep it
  const std::string connection = header_value(lower, lower, "connection");
  request.keep_alive = line.compare(sp2 + 1, 8, "HTTP/1.0") == 0 ? connection.find("keep-alive") != std::string::npos
                                                                  : connection.find("close") == std::string::npos;
  if (const std::size_t at = lower.find("\r\ncontent-length:"); at != std::string::npos) {
    const char* value = head.c_str() + at + 17;
    char* end = nullptr;
    const unsigned long long n = std::strtoull(value, &end, 10);
    if (end == value) {
      HttpServer::respond(fd, 400, HttpServer::error_json("a Content-Length that is not a number"));
      return false;
    }
    if (n > kMaxBody) {
      HttpServer::respond(fd, 413, HttpServer::error_json("a body over 1 MiB"));
      return false;
    }
    length = static_cast<std::size_t>(n);
  }
  request.authorization = header_value(head, lower, "authorization");
  request.body = data.substr(header_end + 4);
  while (request.body.size() < length) {
    const ssize_t n = ::recv(fd, buffer, std::min(sizeof buffer, length - request.body.size()), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      HttpServer::respond(fd, 408, HttpServer::error_json("the body did not arrive whole"));
      return false;
    }
    request.body.append(buffer, static_cast<std::size_t>(n));
  }
  if (request.body.size() > length) request.keep_alive = false;  // a pipelined next request: not read, so close
  request.body.resize(length);
  request.fd = fd;
  return true;
}

}  // namespace

HttpServer::HttpServer(const std::string& host, int port) {
  PM_REQUIRE(port >= 0 && port <= 65535, "--port must be 0 to 65535, got {}", port);
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* found = nullptr;
  const int status = getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found);
  PM_REQUIRE(status == 0 && found, "cannot listen on {}:{}: {}", host, port, gai_strerror(status));
  listen_fd_ = ::socket(found->ai_family, found->ai_socktype, found->ai_protocol);
  const int one = 1;
  if (listen_fd_ >= 0) setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  const bool ok = listen_fd_ >= 0 && ::bind(listen_fd_, found->ai_addr, found->ai_addrlen) == 0 && ::listen(listen_fd_, 64) == 0;
  const std::string why = std::strerror(errno);
  freeaddrinfo(found);
  if (!ok) {
    if (listen_fd_ >= 0) ::close(listen_fd_);
    throw Error(ErrorKind::usage, fmt::format("cannot listen on {}:{}: {}", host, port, why));
  }
  sockaddr_in bound{};
  socklen_t size = sizeof bound;
  getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&bound), &size);
  port_ = ntohs(bound.sin_port);
  acceptor_ = std::thread([this] { accept_loop(); });
}

HttpServer::~HttpServer() {
  stopping_ = true;
  if (acceptor_.joinable()) acceptor_.join();
  ::close(listen_fd_);
  std::lock_guard<std::mutex> lock(queue_->mutex);
  for (const HttpRequest& r : queue_->requests) respond(r.fd, 503, HttpServer::error_json("the server is shutting down"));
  queue_->requests.clear();
}

void HttpServer::accept_loop() {
  while (!stopping_) {
    pollfd p{listen_fd_, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;  // (wakes every 0.1 s to see whether to stop)
    const int fd = ::accept(listen_fd_, nullptr, nullptr);
    if (fd >= 0) read_on(fd);
  }
}

void HttpServer::read_on(int fd) {
  std::thread([fd, queue = queue_] {
    HttpRequest request;
    if (!read_request(fd, request)) return;
    std::lock_guard<std::mutex> lock(queue->mutex);
    queue->requests.push_back(std::move(request));
    queue->arrived.notify_one();
  }).detach();
}

std::optional<HttpRequest> HttpServer::next(double timeout_s) {
  std::unique_lock<std::mutex> lock(queue_->mutex);
  if (!queue_->arrived.wait_for(lock, std::chrono::duration<double>(timeout_s), [&] { return !queue_->requests.empty(); }))
    return std::nullopt;
  HttpRequest r = std::move(queue_->requests.front());
  queue_->requests.pop_front();
  return r;
}

std::size_t HttpServer::waiting() const {
  std::lock_guard<std::mutex> lock(queue_->mutex);
  return queue_->requests.size();
}

void HttpServer::answer(int fd, bool keep_alive, int status, const std::string& body, const std::string& content_type) {
  if (!keep_alive || stopping_) return respond(fd, status, body, content_type);
  if (send_all(fd, whole_answer(status, content_type, body, true)))
    read_on(fd);
  else
    close_connection(fd);
}

void HttpServer::respond(int fd, int status, const std::string& body, const std::string& content_type) {
  send_all(fd, whole_answer(status, content_type, body, false));
  close_connection(fd);
}

bool HttpServer::start_events(int fd) {
  return send_all(fd, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n");
}

bool HttpServer::send_event(int fd, const std::string& data) { return send_all(fd, "data: " + data + "\n\n"); }

std::string HttpServer::error_json(const std::string& message) {
  const nlohmann::json j = {{"error", {{"message", message}, {"type", "invalid_request_error"}}}};
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

bool HttpServer::peer_closed(int fd) {
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, 0) <= 0) return false;
  if (p.revents & (POLLERR | POLLHUP | POLLNVAL)) return true;
  char byte;
  return ::recv(fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT) == 0;
}

void HttpServer::close_connection(int fd) {
  ::shutdown(fd, SHUT_WR);
  ::close(fd);
}

}  // namespace pm::cli
