"""mm.data"""
