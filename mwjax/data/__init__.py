"""mwjax/data"""
