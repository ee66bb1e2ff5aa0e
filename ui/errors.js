// The dashboard's first script: records every page-level error in window.__understudyErrors (an
// array of strings), so a test (or a person at the console) can see that a healthy page has none.
// Loaded before anything else, as a file of its own: the page's CSP forbids inline scripts.
// Recorded: uncaught errors, resources that failed to load (<script>, <link>), unhandled promise
// rejections, console.error calls, and anything the Content-Security-Policy blocked.
'use strict';
(function () {
  var errors = (window.__understudyErrors = window.__understudyErrors || []);

  function record(kind, text) {
    errors.push(kind + ': ' + String(text).slice(0, 2000));
  }

  function describe(value) {
    if (value && value.stack) return String(value.stack);
    if (value && value.message) return String(value.message);
    try {
      return typeof value === 'string' ? value : JSON.stringify(value);
    } catch (e) {
      return String(value);
    }
  }

  // Capture phase: a failed <script>/<link> fires 'error' on the element, which does not bubble.
  window.addEventListener('error', function (event) {
    var target = event.target;
    if (target && target !== window && (target.src || target.href)) {
      record('resource', (target.tagName || 'element').toLowerCase() + ' ' + (target.src || target.href) + ' failed to load');
      return;
    }
    var where = event.filename ? ' (' + event.filename + ':' + event.lineno + ':' + event.colno + ')' : '';
    record('error', (event.error ? describe(event.error) : event.message) + where);
  }, true);

  window.addEventListener('unhandledrejection', function (event) {
    record('unhandledrejection', describe(event.reason));
  });

  document.addEventListener('securitypolicyviolation', function (event) {
    record('csp', event.violatedDirective + ' blocked ' + (event.blockedURI || 'inline') +
      (event.sourceFile ? ' (' + event.sourceFile + ':' + event.lineNumber + ')' : ''));
  });

  var consoleError = console.error;
  console.error = function () {
    var parts = [];
    for (var i = 0; i < arguments.length; i++) parts.push(describe(arguments[i]));
    record('console.error', parts.join(' '));
    return consoleError.apply(console, arguments);
  };
})();
